"""The `sql` task's data: the generated company database and the question families.

The database (4 tables, ~1,000 rows) is built from the seed and written once to
`cache_dir()/tasks/sql-<seed>-<schema hash>.sqlite`. Questions come from 27 families (filters, joins,
aggregates, ORDER BY/LIMIT, GROUP BY/HAVING) with 5 phrasings each; splits are disjoint in phrasings
and in slot values (see `_common`). Gold queries follow one canonical style so a small model can
learn it: upper-case keywords, one line, bare columns on one table, and on joins the aliases
e/d/p/a with the foreign key first (`JOIN departments d ON e.department_id = d.id`).
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .base import SPLITS
from ._common import CITIES, FIRST_NAMES, LAST_NAMES, ValueSplit, rng_for

VERSION = 1  # bump when the generator changes: it is part of the database file name

TABLES = {
    "departments": ["id INTEGER PRIMARY KEY", "name TEXT NOT NULL"],
    "employees": ["id INTEGER PRIMARY KEY", "name TEXT NOT NULL", "department_id INTEGER NOT NULL",
                  "salary INTEGER NOT NULL", "hire_year INTEGER NOT NULL", "city TEXT NOT NULL"],
    "projects": ["id INTEGER PRIMARY KEY", "name TEXT NOT NULL", "department_id INTEGER NOT NULL",
                 "budget INTEGER NOT NULL", "start_year INTEGER NOT NULL"],
    "assignments": ["employee_id INTEGER NOT NULL", "project_id INTEGER NOT NULL", "hours INTEGER NOT NULL"],
}
SCHEMA = "\n".join(f"{t}({', '.join(c.split()[0] for c in cols)})" for t, cols in TABLES.items())
"The schema as the prompt shows it: one line per table."

DEPARTMENTS = [
    "Sales", "Marketing", "Finance", "Research", "Support", "Legal", "Design", "Operations", "Engineering",
    "Logistics", "Security", "Training", "Purchasing", "Quality", "Facilities", "Analytics", "Recruiting",
    "Compliance", "Strategy", "Communications", "Treasury", "Editorial", "Partnerships", "Maintenance",
]
PROJECTS = [
    "Apollo", "Beacon", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Indigo", "Jupiter",
    "Kestrel", "Lumen", "Meridian", "Nimbus", "Orion", "Pioneer", "Quartz", "Radiant", "Summit", "Titan",
    "Umbra", "Vertex", "Willow", "Zephyr", "Atlas", "Borealis", "Comet", "Dynamo", "Echo", "Fusion",
    "Glacier", "Horizon", "Ion", "Javelin", "Keystone", "Lotus", "Mosaic", "Nova", "Onyx", "Polaris",
]
N_EMPLOYEES = 300
HIRE_YEARS = range(2000, 2025)
START_YEARS = range(2005, 2026)
# Threshold lists. Salaries end in 50 and budgets in 500, so no threshold equals a value and
# "more than" vs "at least" cannot change an answer.
SLOT_VALUES = {
    "limit": range(2, 13),
    "count": range(5, 31),
    "year": range(2000, 2026),
    "salary": range(40000, 141000, 1000),
    "hours": range(150, 1001, 50),
}


@dataclass(frozen=True)
class Family:
    name: str
    sql: str
    "The gold query with {slot} placeholders; slots are filled from the split's value pools."
    phrasings: tuple[str, ...]
    ordered: bool = False
    "The gold has ORDER BY, so row order is part of the answer."

    @property
    def slots(self) -> list[str]:
        return list(dict.fromkeys(re.findall(r"{(\w+)}", self.sql)))


_ED = "FROM employees e JOIN departments d ON e.department_id = d.id"
_PD = "FROM projects p JOIN departments d ON p.department_id = d.id"

FAMILIES = [
    # --- filters
    Family("city_employees", "SELECT name FROM employees WHERE city = '{city}'", (
        "Which employees live in {city}?",
        "List the names of employees based in {city}.",
        "Who are the employees whose city is {city}?",
        "Show the names of all employees from {city}.",
        "Give me every employee located in {city}.")),
    Family("salary_above", "SELECT name FROM employees WHERE salary > {salary}", (
        "Which employees earn more than {salary}?",
        "List employees with a salary above {salary}.",
        "Who has a salary greater than {salary}?",
        "Names of employees paid over {salary}.",
        "Find the employees whose salary exceeds {salary}.")),
    Family("city_hired_after", "SELECT name FROM employees WHERE city = '{city}' AND hire_year > {year}", (
        "Which employees in {city} were hired after {year}?",
        "List employees from {city} who joined after {year}.",
        "Who was hired after {year} and lives in {city}?",
        "Show the names of {city} employees with a hire year later than {year}.",
        "Find employees based in {city} hired later than {year}.")),
    Family("hired_in_year", "SELECT name, salary FROM employees WHERE hire_year = {year}", (
        "List the name and salary of employees hired in {year}.",
        "Show names and salaries of everyone who joined in {year}.",
        "What are the names and salaries of the employees hired in {year}?",
        "For employees with hire year {year}, give their name and salary.",
        "Who was hired in {year}, and what does each of them earn?")),
    Family("employee_salary", "SELECT salary FROM employees WHERE name = '{name}'", (
        "What is the salary of {name}?",
        "How much does {name} earn?",
        "Give the salary of the employee named {name}.",
        "What does {name} get paid?",
        "Show the salary of {name}.")),
    Family("projects_started", "SELECT name FROM projects WHERE start_year = {year}", (
        "Which projects started in {year}?",
        "List the projects with start year {year}.",
        "What projects were launched in {year}?",
        "Name the projects that began in {year}.",
        "Show all projects started in the year {year}.")),
    # --- joins
    Family("employee_department", f"SELECT d.name {_ED} WHERE e.name = '{{name}}'", (
        "Which department does {name} work in?",
        "What is the name of the department of {name}?",
        "In which department is {name}?",
        "Name the department of the employee {name}.",
        "{name} belongs to which department?")),
    Family("department_employees", f"SELECT e.name {_ED} WHERE d.name = '{{dept}}'", (
        "Who works in the {dept} department?",
        "List the employees of the {dept} department.",
        "Which employees belong to {dept}?",
        "Show the names of everyone in {dept}.",
        "Give all employees in the {dept} department.")),
    Family("department_salary_above", f"SELECT e.name {_ED} WHERE d.name = '{{dept}}' AND e.salary > {{salary}}", (
        "Which employees in {dept} earn more than {salary}?",
        "List {dept} employees with a salary above {salary}.",
        "Who in the {dept} department is paid over {salary}?",
        "Find employees of {dept} whose salary exceeds {salary}.",
        "Names of people in {dept} earning more than {salary}.")),
    Family("project_members", "SELECT e.name FROM employees e JOIN assignments a ON a.employee_id = e.id "
           "JOIN projects p ON a.project_id = p.id WHERE p.name = '{project}'", (
        "Which employees work on the {project} project?",
        "List the people assigned to project {project}.",
        "Who is assigned to {project}?",
        "Show the names of employees on the {project} project.",
        "Give every employee working on {project}.")),
    Family("employee_projects", "SELECT p.name FROM projects p JOIN assignments a ON a.project_id = p.id "
           "JOIN employees e ON a.employee_id = e.id WHERE e.name = '{name}'", (
        "Which projects does {name} work on?",
        "List the projects {name} is assigned to.",
        "What projects is {name} on?",
        "Show the names of projects that {name} works on.",
        "Name every project with {name} on it.")),
    Family("department_projects", f"SELECT p.name {_PD} WHERE d.name = '{{dept}}'", (
        "Which projects does the {dept} department run?",
        "List the projects owned by {dept}.",
        "What are the projects of the {dept} department?",
        "Show the names of projects belonging to {dept}.",
        "Give all projects run by {dept}.")),
    Family("department_cities", f"SELECT DISTINCT e.city {_ED} WHERE d.name = '{{dept}}'", (
        "In which cities do employees of {dept} live?",
        "List the distinct cities of the employees in {dept}.",
        "Which cities are home to {dept} staff?",
        "What different cities do people in {dept} come from?",
        "Give each city that has an employee in {dept}, once.")),
    # --- aggregates
    Family("count_city", "SELECT COUNT(*) FROM employees WHERE city = '{city}'", (
        "How many employees live in {city}?",
        "Count the employees based in {city}.",
        "What is the number of employees in {city}?",
        "How many people on staff are from {city}?",
        "Give the count of employees whose city is {city}.")),
    Family("count_department_after", f"SELECT COUNT(*) {_ED} WHERE d.name = '{{dept}}' AND e.hire_year > {{year}}", (
        "How many employees in {dept} were hired after {year}?",
        "Count the {dept} employees who joined after {year}.",
        "What is the number of people in the {dept} department hired later than {year}?",
        "How many hires after {year} work in {dept}?",
        "Give the count of {dept} staff with a hire year after {year}.")),
    Family("avg_salary_city", "SELECT AVG(salary) FROM employees WHERE city = '{city}'", (
        "What is the average salary of employees in {city}?",
        "Give the mean salary of the staff based in {city}.",
        "On average, how much do employees living in {city} earn?",
        "Compute the average salary for {city} employees.",
        "What do employees from {city} earn on average?")),
    Family("max_salary_department", f"SELECT MAX(e.salary) {_ED} WHERE d.name = '{{dept}}'", (
        "What is the highest salary in the {dept} department?",
        "What is the top salary paid in {dept}?",
        "Give the maximum salary among {dept} employees.",
        "How much does the best-paid person in {dept} earn?",
        "Find the largest salary in {dept}.")),
    Family("min_salary_year", "SELECT MIN(salary) FROM employees WHERE hire_year = {year}", (
        "What is the lowest salary among employees hired in {year}?",
        "Give the minimum salary of the people hired in {year}.",
        "What is the smallest salary of anyone who joined in {year}?",
        "Find the lowest pay among employees with hire year {year}.",
        "How much does the lowest-paid employee hired in {year} earn?")),
    Family("total_hours_project", "SELECT SUM(a.hours) FROM assignments a JOIN projects p ON a.project_id = p.id "
           "WHERE p.name = '{project}'", (
        "How many hours in total are logged on the {project} project?",
        "What is the total number of hours spent on {project}?",
        "Sum the assignment hours for project {project}.",
        "Give the total hours worked on {project}.",
        "How many hours altogether went into {project}?")),
    # --- ORDER BY (+ LIMIT)
    Family("top_paid_city", "SELECT name FROM employees WHERE city = '{city}' ORDER BY salary DESC LIMIT {limit}", (
        "Who are the {limit} highest-paid employees in {city}, best paid first?",
        "List the top {limit} earners living in {city}, highest salary first.",
        "Name the {limit} employees in {city} with the largest salaries, in order.",
        "Which {limit} employees from {city} earn the most? Order them by salary, highest first.",
        "Show the {limit} best-paid {city} employees from highest to lowest salary."), ordered=True),
    Family("cheapest_projects", "SELECT name, budget FROM projects ORDER BY budget LIMIT {limit}", (
        "List the {limit} cheapest projects with their budgets, cheapest first.",
        "Which {limit} projects have the smallest budgets? Give name and budget, lowest first.",
        "Show name and budget of the {limit} lowest-budget projects in increasing order of budget.",
        "Give the {limit} projects with the lowest budget and their budgets, from lowest up.",
        "What are the {limit} least expensive projects and their budgets, sorted by budget?"), ordered=True),
    Family("department_by_salary", f"SELECT e.name {_ED} WHERE d.name = '{{dept}}' ORDER BY e.salary DESC", (
        "List the employees of {dept} from highest to lowest salary.",
        "Sort the employees of the {dept} department by salary, highest first.",
        "Show everyone in {dept}, ordered by salary in descending order.",
        "Rank the {dept} staff by salary, best paid first.",
        "Give the names of {dept} employees, highest salary first."), ordered=True),
    # --- GROUP BY (+ HAVING)
    Family("count_by_city_after", "SELECT city, COUNT(*) FROM employees WHERE hire_year > {year} GROUP BY city", (
        "How many employees hired after {year} are there in each city?",
        "For each city, count the employees who joined after {year}.",
        "Give the number of employees hired after {year} per city.",
        "Per city, how many employees have a hire year later than {year}?",
        "Count employees hired after {year}, grouped by city.")),
    Family("avg_salary_by_department", f"SELECT d.name, AVG(e.salary) {_ED} WHERE e.hire_year < {{year}} GROUP BY d.name", (
        "For each department, what is the average salary of employees hired before {year}?",
        "Give the average salary per department for staff who joined before {year}.",
        "Per department, show the mean salary of employees with a hire year earlier than {year}.",
        "What do employees hired before {year} earn on average in each department?",
        "List each department with the average salary of its employees hired before {year}.")),
    Family("cities_with_many", "SELECT city FROM employees GROUP BY city HAVING COUNT(*) > {count}", (
        "Which cities have more than {count} employees?",
        "List the cities where over {count} employees live.",
        "Name every city with more than {count} employees.",
        "In which cities do more than {count} of the employees live?",
        "Find cities home to more than {count} employees.")),
    Family("departments_high_avg", f"SELECT d.name {_ED} GROUP BY d.name HAVING AVG(e.salary) > {{salary}}", (
        "Which departments have an average salary above {salary}?",
        "List the departments whose employees earn more than {salary} on average.",
        "Name the departments with a mean salary greater than {salary}.",
        "In which departments is the average salary over {salary}?",
        "Find departments where the average pay exceeds {salary}.")),
    Family("projects_many_hours", "SELECT p.name FROM projects p JOIN assignments a ON a.project_id = p.id "
           "GROUP BY p.name HAVING SUM(a.hours) > {hours}", (
        "Which projects have more than {hours} hours logged in total?",
        "List the projects whose total assignment hours exceed {hours}.",
        "Name the projects with over {hours} hours of work in total.",
        "On which projects were more than {hours} hours spent altogether?",
        "Find projects where the summed hours are greater than {hours}.")),
]


# ----------------------------------------------------------------------------- the database

def schema_hash() -> str:
    ddl = repr((VERSION, TABLES, DEPARTMENTS, PROJECTS, FIRST_NAMES, LAST_NAMES, CITIES, N_EMPLOYEES))
    return hashlib.sha256(ddl.encode()).hexdigest()[:10]


def value_split(seed: int) -> ValueSplit:
    """Every slot kind's values (names, cities, departments, projects, numbers) dealt into split pools."""
    values = ValueSplit(rng_for("sql", seed, "values"))
    values.add("first", FIRST_NAMES)
    values.add("last", LAST_NAMES)
    values.add("city", CITIES)
    values.add("dept", DEPARTMENTS)
    values.add("project", PROJECTS)
    for kind, domain in SLOT_VALUES.items():  # limit before count: the short list gets its held-out values first
        values.add(kind, domain)
    return values


def _rows(seed: int, values: ValueSplit) -> dict[str, list[tuple]]:
    """Every table's rows, drawn from the seed. An employee's first and last name come from one split's
    pools, so a test name shares not even a first name with a training question."""
    rng = rng_for("sql", seed, "db")
    dept_ids = list(range(1, len(DEPARTMENTS) + 1))
    rng.shuffle(dept_ids)
    departments = sorted(zip(dept_ids, DEPARTMENTS))
    base_pay = {i: rng.randrange(50000, 100000) for i in dept_ids}
    city_weight = {c: 1 / (k + 1) ** 0.7 for k, c in enumerate(rng.sample(CITIES, len(CITIES)))}

    names, salaries, employees = set(), set(), []
    cities = CITIES * 3 + rng.choices(CITIES, [city_weight[c] for c in CITIES], k=N_EMPLOYEES - 3 * len(CITIES))
    rng.shuffle(cities)
    for i, city in enumerate(cities, 1):
        split = rng.choices(SPLITS, [1 - 2 * 0.15, 0.15, 0.15])[0]
        for _ in range(100):
            name = f"{rng.choice(values.pools['first'][split])} {rng.choice(values.pools['last'][split])}"
            if name not in names:
                break
        else:
            raise RuntimeError(f"ran out of distinct {split} names; lower N_EMPLOYEES or add names")
        names.add(name)
        dept = rng.choice(dept_ids)
        salary = min(max(int(rng.gauss(base_pay[dept], 14000)) // 100 * 100 + 50, 30050), 179950)
        while salary in salaries:  # unique salaries: ORDER BY salary has a single right order
            salary += 100
        salaries.add(salary)
        employees.append((i, name, dept, salary, rng.choice(HIRE_YEARS), city))

    budgets = rng.sample(range(50500, 990000, 1000), len(PROJECTS))
    projects = [(i, name, rng.choice(dept_ids), budgets[i - 1], rng.choice(START_YEARS))
                for i, name in enumerate(PROJECTS, 1)]
    pairs = {(e, p) for p in range(1, len(PROJECTS) + 1) for e in rng.sample(range(1, N_EMPLOYEES + 1), 3)}
    for e in range(1, N_EMPLOYEES + 1):
        pairs |= {(e, p) for p in rng.sample(range(1, len(PROJECTS) + 1), rng.randint(1, 2))}
    assignments = [(e, p, rng.randint(5, 60)) for e, p in sorted(pairs)]
    return {"departments": departments, "employees": employees, "projects": projects, "assignments": assignments}


def build_database(seed: int, workdir: str | Path | None = None) -> Path:
    """The task's sqlite file for `seed`, written once (atomically) and reused after that."""
    from ...models.load import cache_dir

    folder = Path(workdir) if workdir is not None else cache_dir() / "tasks"
    path = folder / f"sql-{seed}-{schema_hash()}.sqlite"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        con = sqlite3.connect(tmp)
        with con:
            for table, cols in TABLES.items():
                con.execute(f"CREATE TABLE {table} ({', '.join(cols)})")
            for table, rows in _rows(seed, value_split(seed)).items():
                con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
        con.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
